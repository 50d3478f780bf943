"""Model plumbing: architecture adapters (:mod:`epmq.models.adapters`) and model builders/loaders."""
