"""A miniature replication of ESFT (arXiv 2407.01906) and PESC (arXiv 2401.02731) on models pretrained here.

Stages (``python bench/replicate/run.py --stage ...``): corpus -> tokenizer -> pretrain -> experiments ->
report. Every fine-tuning, scoring and evaluation number comes from a ``moecraft`` command line, logged in
``<out>/commands.jsonl``. See bench/replicate/README.md.
"""
