rule merge:
    input:
        base=rules.base.output,
        experts=experts_of,
    output:
        model=Merged.pattern(R),  # R/{suite}/merged/{merge}.safetensors
        record=Merged.pattern(R, ".json"),
    log:
        Merged.job_pattern("logs", "merge", ".log"),
    benchmark:
        Merged.job_pattern("benchmarks", "merge", ".tsv")
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
