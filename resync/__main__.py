from resync._entry import main

main()
