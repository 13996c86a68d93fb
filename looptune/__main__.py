from looptune.cli import main

main()
