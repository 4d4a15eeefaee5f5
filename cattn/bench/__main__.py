from cattn.bench.cli import main

main()
