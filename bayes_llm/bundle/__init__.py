"""Expert bundles: the manifest and its check (`manifest`), publishing a version (`publish`)."""
