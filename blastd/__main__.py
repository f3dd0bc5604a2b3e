from blastd.cli import main

main()
