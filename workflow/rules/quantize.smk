rule quantize:
    input:
        unpack(quantize_inputs),
    output:
        record=f"{R}/{{suite}}/quant/{{merge}}/{{quantizer}}/w{{bits}}g{{group}}/s{{seed}}.json",
        # the quantized model is evaluated in the same job (no weights file written and re-read, no second
        # process start per model); `epmq quantize --out/--packed` writes weights for deployment
        eval=f"{R}/{{suite}}/eval/quant/{{merge}}/{{quantizer}}/w{{bits}}g{{group}}/s{{seed}}.json",
    log:
        "logs/quantize/{suite}/{merge}/{quantizer}/w{bits}g{group}/s{seed}.log",
    benchmark:
        "benchmarks/quantize/{suite}/{merge}/{quantizer}/w{bits}g{group}/s{seed}.tsv"
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        gpu=0 if DEVICE == "cpu" else 1,
        mem_mb=ask_mem(quantize_ask),
        runtime=ask_minutes(quantize_ask),
    params:
        spec=spec,
        qcfg=lambda w: GRID.quant_config(w.quantizer, w.bits, w.group, w.suite),
        n_calib=CAL["n_per_task"],
        device=DEVICE,
    script:
        "../scripts/quantize.py"
