from hbonecap.cli import main

main()
