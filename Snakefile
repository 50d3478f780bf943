# epmq: experts -> merge -> calibrate -> quantize (RTN, GPTQ, E-PMQ) -> evaluate -> leaderboard.
# Run: snakemake --cores all [--resources gpu=N] [--workflow-profile profiles/slurm]; results in reports/.
from snakemake.utils import min_version

import epmq.config

min_version("8.0")

# jobs import epmq from this checkout: a conda env built from envs/epmq.yaml (--sdm conda) does not install it
epmq.config.put_on_jobs_path(workflow.basedir)


# config.yaml is the default grid; a --configfile given on the command line replaces it (not merged into it).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# epmq/schemas/config.schema.yaml: types + defaults; a violation stops here with one line naming the key
epmq.config.validate(config)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/experts.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
