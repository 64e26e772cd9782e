from piuptime.cli import main

raise SystemExit(main())
