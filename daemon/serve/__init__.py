"""`traind serve`: an OpenAI-compatible endpoint on the model as it learns (README, "Talking to the model").

`requests` reads the OpenAI bodies (standard library), `models` holds bases and adapter versions by name,
`engine` runs generation on one thread (queue, interleaving, following current.json), `textstream` turns
tokens into text, `app` is the HTTP face, `__main__` the process.
"""
