# Downloads (hub models and datasets) or registry installs (embedded data) happen here only: a local rule, so
# on a cluster they run on the submit host and the compute jobs never need internet. A hub suite's downloads
# are preprocessed by the next rule, a cluster job (PREPROCESS_SUITES in common.smk).
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
        download_only=preprocessed_later,
    script:
        "../scripts/fetch.py"


# reads the local caches only (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE default to 1 in its script)
rule preprocess:
    input:
        rules.fetch.output,
    output:
        f"{R}/{{suite}}/preprocessed.json",
    log:
        "logs/preprocess/{suite}.log",
    benchmark:
        "benchmarks/preprocess/{suite}.tsv"
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        mem_mb=ask_mem(by_suite),
        runtime=ask_minutes(by_suite),
    params:
        spec=spec,
    script:
        "../scripts/preprocess.py"


rule base:
    input:
        fetched,
    output:
        Base.pattern(R),  # R/{suite}/base.safetensors
    log:
        Base.job_pattern("logs", "base", ".log"),
    benchmark:
        Base.job_pattern("benchmarks", "base", ".tsv")
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        gpu=suite_gpus,
        mem_mb=ask_mem(by_suite),
        runtime=ask_minutes(by_suite),
    params:
        spec=spec,
    script:
        "../scripts/build_base.py"


rule expert:
    input:
        rules.base.output,
    output:
        Expert.pattern(R),  # R/{suite}/experts/{task}.safetensors
    log:
        Expert.job_pattern("logs", "expert", ".log"),
    benchmark:
        Expert.job_pattern("benchmarks", "expert", ".tsv")
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        mem_mb=ask_mem(expert_ask),
        runtime=ask_minutes(expert_ask),
    params:
        spec=spec,
    script:
        "../scripts/build_expert.py"
