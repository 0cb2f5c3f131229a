from qkvx.cli import main

main()
