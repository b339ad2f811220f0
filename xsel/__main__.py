from xsel.cli import main

main()
