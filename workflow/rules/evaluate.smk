rule evaluate:
    input:
        weights_of,
    output:
        f"{R}/{{suite}}/eval/{{model}}.json",
    log:
        "logs/evaluate/{suite}/{model}.log",
    benchmark:
        "benchmarks/evaluate/{suite}/{model}.tsv"
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
