from .lightning.cli import main

main()
