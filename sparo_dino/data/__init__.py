"""Images in, crops out: the files a --data_path holds, datasets, both multi-crop pipelines, the loader."""
