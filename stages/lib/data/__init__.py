"""The data a stage reads: token files and training windows (batches), corpus languages and prompts
(language), and fetching a corpus from a URL."""
