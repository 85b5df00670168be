from ray_train.cli import main

raise SystemExit(main())
