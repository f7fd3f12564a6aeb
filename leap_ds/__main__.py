from leap_ds.apps.cli import main

main()
