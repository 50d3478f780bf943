rule base:
    output:
        f"{R}/{{suite}}/base.safetensors",
    log:
        "logs/base/{suite}.log",
    benchmark:
        "benchmarks/base/{suite}.tsv"
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
    params:
        spec=spec,
    script:
        "../scripts/build_base.py"


rule expert:
    input:
        rules.base.output,
    output:
        f"{R}/{{suite}}/experts/{{task}}.safetensors",
    log:
        "logs/expert/{suite}/{task}.log",
    benchmark:
        "benchmarks/expert/{suite}/{task}.tsv"
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
    params:
        spec=spec,
    script:
        "../scripts/build_expert.py"
