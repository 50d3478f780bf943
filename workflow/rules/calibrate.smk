rule calibrate:
    input:
        rules.base.output,
    output:
        f"{R}/{{suite}}/calib/n{{n}}_s{{seed}}.safetensors",
    log:
        "logs/calibrate/{suite}/n{n}_s{seed}.log",
    benchmark:
        "benchmarks/calibrate/{suite}/n{n}_s{seed}.tsv"
    conda:
        "../../envs/epmq.yaml"
    threads: 1
    resources:
        mem_mb=ask_mem(by_suite),
        runtime=ask_minutes(by_suite),
    params:
        spec=spec,
        batch_size=CAL["batch_size"],
    script:
        "../scripts/calibrate.py"
