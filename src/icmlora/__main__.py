from icmlora.cli import main

raise SystemExit(main())
