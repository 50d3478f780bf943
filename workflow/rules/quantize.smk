rule quantize:
    input:
        unpack(quantize_inputs),
    output:
        model=temp(
            f"{R}/{{suite}}/quant/{{merge}}/{{quantizer}}/w{{bits}}g{{group}}/s{{seed}}.safetensors"
        ),
        record=f"{R}/{{suite}}/quant/{{merge}}/{{quantizer}}/w{{bits}}g{{group}}/s{{seed}}.json",
    log:
        "logs/quantize/{suite}/{merge}/{quantizer}/w{bits}g{group}/s{seed}.log",
    benchmark:
        "benchmarks/quantize/{suite}/{merge}/{quantizer}/w{bits}g{group}/s{seed}.tsv"
    conda:
        "../../envs/epmq.yaml"
    threads: THREADS
    resources:
        gpu=0 if DEVICE == "cpu" else 1,
        mem_mb=8000,
    params:
        spec=spec,
        qcfg=lambda w: GRID.quant_config(w.quantizer, w.bits, w.group),
        n_calib=CAL["n_per_task"],
        device=DEVICE,
    script:
        "../scripts/quantize.py"
