"""The hot folder behind `aoi watch`: new images are judged once they are complete, with the outputs of `aoi run`.

`settle` holds the completeness rule (when a file being written or copied is finished), `hotfolder` the watcher
(watchdog events, a polling fallback for network shares, batches through the folder runner's pieces, restart
safety from `preds.jsonl`, moves to a done and an error folder).
"""
