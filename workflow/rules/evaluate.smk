rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        render(R, "{suite}", "{model}", ".json", folder="eval"),  # R/{suite}/eval/{model}.json
    log:
        job_file("logs", "evaluate", "{suite}", "{model}", ".log"),
    benchmark:
        job_file("benchmarks", "evaluate", "{suite}", "{model}", ".tsv")
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        gpu=suite_gpus,
        mem_mb=ask_mem(evaluate_ask),
        runtime=ask_minutes(evaluate_ask),
    params:
        spec=spec,
    script:
        "../scripts/evaluate.py"
