"""``python -m meshllm`` runs the command line."""

from meshllm.cli.main import main

main()
