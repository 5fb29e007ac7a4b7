from vipkg.cli import main

raise SystemExit(main())
