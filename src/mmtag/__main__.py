from mmtag.cli import main

raise SystemExit(main())
