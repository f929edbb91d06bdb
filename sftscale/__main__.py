from sftscale.cli import main

raise SystemExit(main())
