from mechedit.cli import main

main()
