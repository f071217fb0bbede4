"""What a site does, in one place: its data shares and profile (:mod:`.cache`), its state between messages and its
base (:mod:`.state`), its local round and final scores (:mod:`.round`), and the warm worker that keeps the base on its
accelerator (:mod:`.worker`, frames in :mod:`.wire`). Free of Flower: the ClientApp only moves messages in and out."""
