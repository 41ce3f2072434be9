"""The run's metric names: which facts are evaluated when, and the prefixes that say so.

Every logged metric name starts with its population and moment, so a curve can never be
mistaken for another (after-each-batch vs after-all-edits, edited vs never-edited facts):

=========================  =============================================  ==========================
prefix                     population                                      moment
=========================  =============================================  ==========================
``pre_edit/to_edit/``      the facts that will be edited (same sample)     before the first edit
``last_batch/``            the batch just edited                           right after its edit
``edited_so_far/``         every fact edited so far (or a fixed sample)    at ``facts.every_n_batches`` / ``facts.at_edits``
``never_edited/``          held-out facts, never edited                    at the same points
``pre_edit/edited_so_far/`` the same edited-so-far sample, unedited weights at the same points (``facts.unedited_baseline``)
``final/edited/``          every edited fact                               after all edits (``fit`` end, ``validate``)
``final/never_edited/``    held-out facts                                  after all edits (``test``)
``pre_edit/general/``      general-ability tasks and perplexity            before the first edit
``general/``               general-ability tasks and perplexity            every ``every_n_batches`` batches
``final/general/``         general-ability tasks and perplexity            ``validate`` / ``test`` of an edited model
``canary/``                perplexity windows, never-edited facts          before editing, every ``every_n_batches`` batches
``guard/``                 the collapse guard's signals and breaches      after every batch (when the guard is on)
=========================  =============================================  ==========================

The README maps the metric names that follow the prefix to the paper's and EasyEdit's names.
"""

PRE_EDIT = "pre_edit/to_edit/"
LAST_BATCH = "last_batch/"
EDITED_SO_FAR = "edited_so_far/"
EDITED_SO_FAR_UNEDITED = "pre_edit/edited_so_far/"
NEVER_EDITED = "never_edited/"
FINAL_EDITED = "final/edited/"
FINAL_NEVER_EDITED = "final/never_edited/"
PRE_EDIT_GENERAL = "pre_edit/general/"
GENERAL = "general/"
FINAL_GENERAL = "final/general/"
CANARY = "canary/"
GUARD = "guard/"

#: prefixes of metrics measured on edit facts, in the order a summary lists them
FACT_PREFIXES = (PRE_EDIT, LAST_BATCH, EDITED_SO_FAR, NEVER_EDITED, FINAL_EDITED, FINAL_NEVER_EDITED)
