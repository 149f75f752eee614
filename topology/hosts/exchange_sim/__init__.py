"""exchange_sim: the simulated Exchange host of the dmzproxy lab, in pieces that the test
servers reuse. Python 3 standard library only.

    jsonlog    one JSON object per line, flushed at once (what a test reads back)
    serve      listening sockets, the accept loop (a thread per connection), stop signals
    tls        server TLS contexts that remember the SNI; a certificate's DNS names
    http       HTTP/1.1 server connections: heads, framing, bodies, responses
    ntlm       NTLMSSP messages and IIS's connection-based NTLM; Basic credentials
    smtp       ESMTP server sessions: the command loop, MAIL, RCPT, DATA and BDAT, with the
               reply texts in a table so that each server speaks its own dialect
    store      the mail store: one .eml and its .json sidecar per message, each renamed
               into place
    web        Exchange's web services (OWA, ActiveSync, Outlook Anywhere, MAPI, EWS,
               Autodiscover, OAB) as the simulated host serves them
    rpc        Outlook Anywhere channel pairs (the IN channel's bytes echoed on OUT)
    transport  Exchange's FrontEnd and Hub transport as the simulated host speaks them
    stats      the simulated host's statistics (GET /stats)

Users: topology/hosts/exchange_host.py (the lab's host, started by `dmzproxy lab up`),
tests/integration/origin.py (the test HTTP origin) and tests/integration/smtp_sink.py (the
test SMTP sink). What only tests need (holds, silences, refusals on demand, a receiver that
takes a bare LF as a line end) stays in those two files.
"""
