"""LiveMind: answer one request with several expert models and merge their answers.

    routing.py     which experts (ensemble name, `auto` by task tags, or an explicit list)
    extract.py     a comparable answer from free text (option letter, last number, normalised text)
    strategies.py  pure merge maths: vote, judge prompt/verdict, synthesize prompt
    fanout.py      parallel expert calls: per-expert timeout, quorum, cancellation
    service.py     glue: runs experts through serving.Generation (pool leases, worker threads)

User documentation: docs/consensus.md.
"""
