// The collaborators list: everyone in the room (once, however many tabs), from the live awareness
// states the server stamps with {user: {id, name, color, role}}, merged with the presence API's
// idle flags (GET /api/rooms/<room>/presence, polled). Click a collaborator to jump to their cursor.

import { $, avatar, h } from './util.js'

const POLL_MS = 5000

export class Collaborators {
  constructor ({ session, room, provider, me, owner, onJump }) {
    this.session = session
    this.room = room
    this.provider = provider
    this.me = me
    this.owner = owner // the room owner's user id, if known
    this.onJump = onJump
    this.presence = new Map() // user id -> {idle, role}
    this.list = $('collaborators')
    this._render = this._render.bind(this)
    provider.awareness.on('change', this._render)
    this.timer = setInterval(() => this.poll(), POLL_MS)
    this.poll()
    this._render()
  }

  async poll () {
    try {
      const data = await this.session.api(`/api/rooms/${this.room.split('/').map(encodeURIComponent).join('/')}/presence`, { room: this.room })
      this.presence = new Map((data.users || []).map((u) => [u.id, u]))
      this._render()
    } catch {
      // presence API unavailable: the live awareness list is still right, without idle flags
    }
  }

  /** One entry per user: [{id, name, color, role, idle, clients: [{clientID, cursor}], self}] */
  users () {
    const users = new Map()
    const localId = this.provider.awareness.clientID
    for (const [clientID, state] of this.provider.awareness.getStates()) {
      if (!state || !state.user) continue
      const self = clientID === localId
      const id = self ? this.me.id : (state.user.id || `client:${clientID}`)
      let user = users.get(id)
      if (!user) {
        user = {
          id,
          name: self ? this.me.name : (state.user.name || 'Anonymous'),
          color: state.user.color || '#888888',
          role: self ? this.me.role : id === this.owner ? 'owner' : (state.user.role || (state.user.readOnly ? 'viewer' : 'editor')),
          self,
          clients: []
        }
        users.set(id, user)
      }
      user.clients.push({ clientID, cursor: state.cursor || null })
    }
    for (const user of users.values()) {
      const known = this.presence.get(user.id)
      user.idle = known ? !!known.idle : false
    }
    return [...users.values()].sort((a, b) => (b.self - a.self) || a.name.localeCompare(b.name))
  }

  _render () {
    const users = this.users()
    $('collab-count').textContent = users.length ? `(${users.length})` : ''
    this.list.replaceChildren(...users.map((user) => {
      const cursor = user.clients.find((c) => c.cursor)?.cursor
      return h('li', {
        class: 'collaborator' + (user.idle ? ' idle' : '') + (user.self ? ' self' : ''),
        dataset: { userId: user.id, name: user.name },
        title: user.self ? 'You' : (cursor ? `Jump to ${user.name}'s cursor` : user.name),
        onclick: () => { if (!user.self && cursor) this.onJump(cursor) }
      },
      avatar(user.name, user.color),
      h('span', { class: 'collab-name' }, user.name, user.self ? h('span', { class: 'muted' }, ' (you)') : null),
      h('span', { class: 'collab-meta' },
        h('span', { class: 'role role-' + user.role }, user.role),
        h('span', { class: 'presence-dot' + (user.idle ? ' idle' : ' active'), title: user.idle ? 'idle' : 'active' }),
        h('span', { class: 'idle-label' }, user.idle ? 'idle' : 'active'))
      )
    }))
  }

  destroy () {
    clearInterval(this.timer)
    this.provider.awareness.off('change', this._render)
    this.list.replaceChildren()
    $('collab-count').textContent = ''
  }
}
