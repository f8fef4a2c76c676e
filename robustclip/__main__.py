from robustclip.cli import main

main()
