from resync.cli import main

main()
