from model_forensics.cli import main

main()
