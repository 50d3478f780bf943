rule merge:
    input:
        base=rules.base.output,
        experts=experts_of,
        calib=merge_calib,
    output:
        model=f"{R}/{{suite}}/merged/{{merge}}.safetensors",
        record=f"{R}/{{suite}}/merged/{{merge}}.json",
    log:
        "logs/merge/{suite}/{merge}.log",
    benchmark:
        "benchmarks/merge/{suite}/{merge}.tsv"
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        gpu=suite_gpus,
        mem_mb=ask_mem(merge_ask),
        runtime=ask_minutes(merge_ask),
    params:
        spec=spec,
        merge=lambda w: GRID.merges[w.merge],
    script:
        "../scripts/merge.py"
