"""Where image embeddings live between requests.

Holds the in-memory LRU (:mod:`.memory`), the store contract and its entry
format (:mod:`.store`), the disk and Redis stores (:mod:`.disk_store`,
:mod:`.redis_store`) and the choice between them (:mod:`.settings`), store
keys and preset fingerprints (:mod:`.fingerprints`), the queue that runs a
process's encodes one call at a time, clicks first (:mod:`.encode_queue`), and
the tiers that the server and the commands ask for an embedding: memory, then
the store, then the encoder, once per image across threads and workers
(:mod:`.tiers`).

May import: ``sam_backend.sam`` and ``sam_backend.errors``. Never Label Studio
or HTTP.
"""
