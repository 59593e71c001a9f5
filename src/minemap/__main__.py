from minemap.cli import main

main()
