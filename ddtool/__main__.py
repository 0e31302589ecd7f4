from ddtool.cli.main import main

main()
