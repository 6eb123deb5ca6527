"""The web console at ``/console``: static ES modules and CSS, served by the API process.

The console is only a client of the public API: it holds no route that reads or writes data. Every call it
makes goes to ``/v1`` with the API key the user pasted (kept in the tab's ``sessionStorage``, sent as
``Authorization: Bearer``), so tenant isolation and validation are exactly the API's. See docs/console.md.
"""
