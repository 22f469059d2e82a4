"""Image policies: the document model and loader, the active (reloadable) policy set,
evaluation of images against it, the rule kinds (``rules/``), and pull-time enforcement."""
