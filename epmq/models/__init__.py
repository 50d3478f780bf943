"""Model plumbing: architecture adapters (:mod:`epmq.models.adapters`), where models come from and how they load
(:mod:`epmq.models.sources`), state-dict conversions between libraries (:mod:`epmq.models.convert`: HF CLIP ->
open_clip), the in-house BERT encoder (:mod:`epmq.models.bert`) and open_clip's model code without torchvision
(:mod:`epmq.models.openclip`)."""
