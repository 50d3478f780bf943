# reads the run records and benchmark files, writes tables and figures: a few seconds, so on a cluster it runs
# on the submit host (a local rule) instead of waiting in the queue
rule report:
    input:
        evals=GRID.eval_paths(),
        benchmarks=GRID.quant_benchmarks(),
    output:
        csv=report(
            f"{REPORTS}/leaderboard.csv",
            caption="../report/leaderboard_csv.rst",
            category="Leaderboard",
        ),
        md=f"{REPORTS}/leaderboard.md",
        html=report(
            f"{REPORTS}/leaderboard.html",
            caption="../report/leaderboard.rst",
            category="Leaderboard",
        ),
        figures=report(
            directory(f"{REPORTS}/figures"),
            patterns=["{name}.svg"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    localrule: True
    conda:
        "../../envs/epmq.yaml"
    threads: 1
    params:
        # numbers quoted from the literature, shown beside ours (never averaged): a change re-runs this rule only
        anchors=config.get("anchors", {}),
    script:
        "../scripts/report.py"
