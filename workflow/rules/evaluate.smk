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
        gpu=eval_gpus,
        mem_mb=4000,
    params:
        spec=spec,
    script:
        "../scripts/evaluate.py"
