rule calibrate:
    input:
        rules.base.output,
    output:
        Calib.pattern(R),  # R/{suite}/calib/n{n}_s{seed}.safetensors
    log:
        Calib.job_pattern("logs", "calibrate", ".log"),
    benchmark:
        Calib.job_pattern("benchmarks", "calibrate", ".tsv")
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
