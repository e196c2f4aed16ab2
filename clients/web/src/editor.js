// The editor: CodeMirror 6 bound to the room's Y.Text by y-codemirror.next.
//
// Undo/redo are the server's per-user undo (extension messages), so yCollab's local UndoManager
// is off and Mod-z / Mod-Shift-z / Mod-y (and the browser's historyUndo/historyRedo input events)
// go to the `onUndo` / `onRedo` callbacks. Chat messages anchored to a range are drawn as marks.

import * as Y from 'yjs'
import { yCollab } from 'y-codemirror.next'
import { Compartment, EditorSelection, EditorState, Prec, StateEffect, StateField } from '@codemirror/state'
import {
  Decoration, EditorView, WidgetType, crosshairCursor, drawSelection, dropCursor, highlightActiveLine,
  highlightActiveLineGutter, highlightSpecialChars, keymap, lineNumbers, rectangularSelection
} from '@codemirror/view'
import { defaultKeymap, indentWithTab } from '@codemirror/commands'
import { bracketMatching, defaultHighlightStyle, indentOnInput, syntaxHighlighting } from '@codemirror/language'
import { markdown } from '@codemirror/lang-markdown'

/** A Yjs relative position as JSON, for an index in ytext. */
export const relJSON = (ytext, index, assoc = 0) =>
  Y.relativePositionToJSON(Y.createRelativePositionFromTypeIndex(ytext, index, assoc))

/** An absolute index for a relative position given as JSON, or null. */
export const absIndex = (doc, json) => {
  if (!json || typeof json !== 'object') return null
  try {
    const abs = Y.createAbsolutePositionFromRelativePosition(Y.createRelativePositionFromJSON(json), doc)
    return abs ? abs.index : null
  } catch {
    return null
  }
}

// -- chat anchors ------------------------------------------------------------------------------

export const setAnchors = StateEffect.define()

class AnchorWidget extends WidgetType {
  constructor (id, title) { super(); this.id = id; this.title = title }
  eq (other) { return other.id === this.id && other.title === this.title }
  toDOM () {
    const el = document.createElement('span')
    el.className = 'cm-chat-marker'
    el.title = this.title
    el.dataset.messageId = this.id
    return el
  }
  ignoreEvent () { return false }
}

const anchorField = (ydoc) => StateField.define({
  create: () => [],
  update (value, tr) {
    for (const effect of tr.effects) if (effect.is(setAnchors)) return effect.value
    return value
  },
  provide: (field) => EditorView.decorations.compute([field, 'doc'], (state) => {
    const length = state.doc.length
    const ranges = []
    for (const a of state.field(field)) {
      let from = absIndex(ydoc, a.from)
      let to = absIndex(ydoc, a.to)
      if (from == null || to == null) continue
      if (from > to) [from, to] = [to, from]
      from = Math.min(from, length)
      to = Math.min(to, length)
      if (to > from) ranges.push(Decoration.mark({ class: 'cm-chat-anchor', attributes: { 'data-message-id': String(a.id) } }).range(from, to))
      ranges.push(Decoration.widget({ widget: new AnchorWidget(a.id, a.title), side: 1 }).range(to))
    }
    return Decoration.set(ranges, true)
  })
})

// -- the editor ----------------------------------------------------------------------------------

export const createEditor = ({ parent, ydoc, ytext, awareness, readOnly, onUndo, onRedo, onMarker, onSelection }) => {
  const editable = new Compartment()
  const lock = (ro) => [EditorState.readOnly.of(ro), EditorView.editable.of(true)]
  const serverHistory = Prec.highest(keymap.of([
    { key: 'Mod-z', run: () => { onUndo(); return true }, preventDefault: true },
    { key: 'Mod-Shift-z', run: () => { onRedo(); return true }, preventDefault: true },
    { key: 'Mod-y', run: () => { onRedo(); return true }, preventDefault: true }
  ]))
  const field = anchorField(ydoc)
  const view = new EditorView({
    parent,
    state: EditorState.create({
      doc: ytext.toString(),
      extensions: [
        serverHistory,
        EditorView.domEventHandlers({
          beforeinput (event) {
            if (event.inputType === 'historyUndo') { event.preventDefault(); onUndo(); return true }
            if (event.inputType === 'historyRedo') { event.preventDefault(); onRedo(); return true }
            return false
          },
          click (event) {
            const marker = event.target.closest && event.target.closest('[data-message-id]')
            if (marker && onMarker) { onMarker(marker.dataset.messageId); return false }
            return false
          }
        }),
        lineNumbers(),
        highlightActiveLineGutter(),
        highlightSpecialChars(),
        drawSelection(),
        dropCursor(),
        indentOnInput(),
        bracketMatching(),
        rectangularSelection(),
        crosshairCursor(),
        highlightActiveLine(),
        syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
        markdown(),
        EditorView.lineWrapping,
        keymap.of([...defaultKeymap, indentWithTab]),
        editable.of(lock(readOnly)),
        EditorView.updateListener.of((update) => {
          if (update.selectionSet && onSelection) onSelection(update.state.selection.main)
        }),
        field,
        yCollab(ytext, awareness, { undoManager: false })
      ]
    })
  })

  return {
    view,
    setReadOnly (ro) { view.dispatch({ effects: editable.reconfigure(lock(ro)) }) },
    setAnchors (anchors) { view.dispatch({ effects: setAnchors.of(anchors) }) },
    /** The current selection as relative positions, or null when it is empty. */
    selectionAnchor () {
      const { from, to } = view.state.selection.main
      if (from === to) return null
      return { start: relJSON(ytext, from, 0), end: relJSON(ytext, to, -1) }
    },
    /** A range given as relative positions, as current offsets (or null). */
    resolve (fromJSON, toJSON) {
      const length = view.state.doc.length
      const a = absIndex(ydoc, fromJSON)
      const b = toJSON ? absIndex(ydoc, toJSON) : a
      if (a == null || b == null) return null
      return { from: Math.min(a, b, length), to: Math.min(Math.max(a, b), length) }
    },
    /** Select and scroll to a range given as relative positions. */
    reveal (fromJSON, toJSON) {
      const length = view.state.doc.length
      let from = absIndex(ydoc, fromJSON)
      let to = toJSON ? absIndex(ydoc, toJSON) : from
      if (from == null) return false
      if (to == null) to = from
      from = Math.min(from, length)
      to = Math.min(to, length)
      view.dispatch({
        selection: EditorSelection.single(from, to),
        effects: EditorView.scrollIntoView(Math.min(from, to), { y: 'center' })
      })
      view.focus()
      return true
    },
    destroy () { view.destroy() }
  }
}
