"""Prompt templates of the synthesis workflow (plain ``str.format`` templates).

They follow the agent workflow of "Bootstrap Your Own Context Length" (Wang et
al., 2024) in spirit: a seed passage makes the LM invent a multi-document
instruction; query-focused summaries condense each retrieved chunk; the answer
is written from the summaries; long outputs are back-translated into the
instruction that would produce them. Edit them here; every field is named.
"""

# (a) an instruction needing several documents, seeded by a random passage for diversity.
INSTRUCTION = (
    "Here is a passage from a large collection of documents:\n\n{text}\n\n"
    "Write one instruction or question a user could ask about this topic that can only be "
    "answered well by reading and combining several documents of the collection. "
    "Write the instruction only.\nInstruction:"
)

# (d) a query-focused summary of one chunk, or of a group of summaries.
SUMMARY = (
    "Instruction: {instruction}\n\nText:\n{text}\n\n"
    "Summarize what the text says that helps with the instruction, in at most {words} words. "
    "If nothing in it helps, say so in one sentence.\nSummary:"
)

# (e) the answer, written from the (possibly recursive) summaries.
ANSWER = (
    "Instruction: {instruction}\n\nNotes taken from the relevant documents:\n{summaries}\n\n"
    "Using these notes, write a complete and accurate response to the instruction.\nResponse:"
)

# Long output: the instruction that would make a writer produce this text (back-translation).
BACKTRANSLATE = (
    "Here is {what}:\n\n{text}\n\n"
    "Write the instruction a user would give a writer to get this text written: its topic, "
    "content, structure, style and length (about {words} words). "
    "Write the instruction only.\nInstruction:"
)
BACKTRANSLATE_WHAT_TEXT = "a text"
BACKTRANSLATE_WHAT_NOTES = "notes summarizing a long text, in order"

# The summary focus when a long-output document is too long to show the LM whole.
LONG_OUTPUT_FOCUS = "Describe the content, structure and style of this text."

# (f) the long input the trained model will read: the documents, then the instruction.
DOCUMENT = "Document {number}:\n{text}"
DOCUMENT_SEPARATOR = "\n\n"
INPUT = "{documents}\n\n{instruction}\n\n"
SUMMARY_SEPARATOR = "\n\n"
