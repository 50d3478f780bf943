# Downloads (hub models and datasets) or registry installs (embedded data) happen here only: a local rule, so
# on a cluster the compute jobs never need internet.
rule fetch:
    output:
        f"{R}/{{suite}}/fetched.json",
    log:
        "logs/fetch/{suite}.log",
    benchmark:
        "benchmarks/fetch/{suite}.tsv"
    localrule: True
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    params:
        spec=spec,
    script:
        "../scripts/fetch.py"


rule base:
    input:
        rules.fetch.output,
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
