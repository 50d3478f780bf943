rule quantize:
    input:
        unpack(quantize_inputs),
    output:
        # R/{suite}/quant/{merge}/{quantizer}/w{bits}g{group}/s{seed}.json
        record=QuantRun.pattern(R, ".json"),
        # the quantized model is evaluated in the same job (no weights file written and re-read, no second
        # process start per model); `epmq quantize --out/--packed` writes weights for deployment
        eval=QuantRun.pattern(R, ".json", folder="eval"),
    log:
        QuantRun.job_pattern("logs", "quantize", ".log"),
    benchmark:
        QuantRun.job_pattern("benchmarks", "quantize", ".tsv")
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        gpu=0 if DEVICE == "cpu" else 1,
        mem_mb=ask_mem(quantize_ask),
        runtime=ask_minutes(quantize_ask),
    params:
        spec=spec,
        qcfg=lambda w: GRID.quant_config(quant_run(w)),
        n_calib=CAL["n_per_task"],
        device=DEVICE,
    script:
        "../scripts/quantize.py"
